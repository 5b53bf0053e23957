"""The files of a hub repo that ``push`` writes and ``pull`` reads, per hookpoint folder."""

COMPACT_NAME = "expander.safetensors"  # the compact file
CFG_NAME = "cfg.json"  # SAELens-style facts beside each compact file, for hub tools
ONNX_NAME = "encode.onnx"  # the --with-onnx export
CARD_NAME = "README.md"  # the model card, at the repo root
