"""The names of the SAE kinds (activations, encoders): plain constants, no torch, shared by the models, the
file codec and the torch-free runtime."""

# The one definition of the top-k orderings: activation -> (what top-k ranks: "value" (pre),
# "relu" (ReLU(pre)) or "abs" (|pre|, the kept values keep their sign); ReLU on the kept values).
# Every spelling (chunked encode, sparse training ops, ONNX graphs) reads this table.
ORDERINGS: dict[str, tuple[str, bool]] = {
    "topk_relu": ("value", True), "relu_topk": ("relu", False), "signed_topk": ("value", False),
    "abs_topk": ("abs", False)}
ACTIVATIONS = tuple(ORDERINGS)
# Activations gated by a learned threshold (the per-latent / global θ buffer ``threshold``).
THRESHOLD_ACTIVATIONS = ("jumprelu", "batchtopk")
# Activations that fire a variable number of latents per row, ``k`` capping what is kept (``max_l0``).
VARIABLE_COUNT = THRESHOLD_ACTIVATIONS + ("topafa",)
ALL_ACTIVATIONS = ACTIVATIONS + VARIABLE_COUNT
# Expander encoders: the decoder's values (tied), their own values (untied), or none (matching pursuit over
# the decoder rows).
ENCODERS = ("tied", "untied", "pursuit")
