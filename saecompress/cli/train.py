"""``saecompress train``: train an Expander SAE natively, or distil a converted one from its teacher."""

from __future__ import annotations

import click

from .._json import dumps
from ..convert import MASKS
from ..errors import SaeCompressError
from ..lm import SITES
from ..launch import process_group, run_ranks
from ..compact_format import read_compact_metadata
from ..models import ACTIVATIONS, ALL_ACTIVATIONS, ENCODERS
from ..train import CHECKPOINT_SUFFIX, TrainConfig
from ..trainer import SPARSITY_TARGETS
from ..train import train as run_training
from .acts import text_options
from .options import config_option, hub_options



@click.command("train")
@click.option("--acts", type=click.Path(exists=True), default=None,
              help="Activations [N, m]: a .npy/.safetensors file or a shard folder from `saecompress acts`. "
                   "The last --held-out rows are kept for the final metrics.")
@click.option("--model", "model_path", default=None,
              help="Instead of --acts: train from this causal LM (folder, hub id or .gguf) over --text, one SAE per "
                   "--layers hookpoint, with no activation files.")
@text_options
@click.option("--layers", default=None, help="With --model: the layers to train on, e.g. 6,12,18 (one LM pass serves them all).")
@click.option("--site", type=click.Choice(SITES), default="resid", show_default=True,
              help="With --model: resid (output of each block), mlp_out or attn_out.")
@click.option("--lm-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --model: contexts per LM forward pass.")
@click.option("--distribute-hookpoints", is_flag=True,
              help="With --model and several processes: each process trains its own hookpoints (on every process's "
                   "rows, gathered), instead of every process training every hookpoint on its share.")
@click.option("--window", type=click.IntRange(min=1), default=256, show_default=True,
              help="With --model: contexts per shuffle window (rows are shuffled within a window; a multiple of "
                   "--lm-batch).")
@click.option("--out", required=True, type=click.Path(),
              help="Output compact .safetensors file (with --dense: a SAELens folder); with --model a folder of "
                   "HOOKPOINT/expander.safetensors, as `push` uploads. A checkpoint OUT.ckpt (with --model: "
                   "OUT/train.ckpt) is written beside it.")
@config_option(TrainConfig, "d", "--d", "d", type=click.IntRange(min=1), help="Nonzeros per latent (mask degree).")
@click.option("--dense", is_flag=True, help="Train a dense TopK SAE baseline instead (refuses --d, --encoder, --mask, --mask-seed).")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="Active latents per token; for jumprelu / batchtopk the target mean L0 (the saved k is then "
                   "the 99.9th percentile of per-row L0 on the held-out rows) [default: 32, or the "
                   "--teacher/--init SAE's k (threshold SAE: its mean L0 on the first rows)].")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Number of latents.")
@click.option("--expansion", type=click.IntRange(min=1), default=None, help="Number of latents as a multiple of m (instead of --n).")
@click.option("--teacher", default=None,
              help="Dense SAE source (any layout, or hf://...) to distil from: the student starts as "
                   "convert(teacher, d) and keeps each latent close to the teacher's same-index latent.")
@click.option("--init", default=None, help="Start from this SAE (compact file) instead of a fresh or converted one.")
@config_option(TrainConfig, "tokens", "--tokens", type=click.IntRange(min=1),
              help="Training tokens (whole batches: a remainder is dropped, with a note).")
@config_option(TrainConfig, "batch_size", "--batch-size", type=click.IntRange(min=1),
               help="Activation rows (tokens) per step.")
@click.option("--batch", "batch_alias", type=click.IntRange(min=1), default=None, hidden=True,
              help="Older name of --batch-size (--batch elsewhere counts contexts).")
@click.option("--lr", type=float, default=None,
              help="Adam learning rate [default: 3e-3 / sqrt(n / 16384) for expanders, "
                   "2e-4 / sqrt(n / 16384) with --dense].")
@click.option("--activation", type=click.Choice(ALL_ACTIVATIONS), default=None,
              help="Activation of a fresh SAE [default: signed_topk, dense: topk_relu]: a top-k ordering, or "
                   "jumprelu (Rajamanoharan et al. 2024: learned per-latent thresholds, straight-through "
                   "gradients, mean L0 pulled to --k) or batchtopk (Bussmann et al. 2024: the top batch x k "
                   "activations of each batch; saved with one global threshold) or topafa (Lee et al. 2025: "
                   "the count per row chosen by norm matching, --k its cap).")
@click.option("--balance", type=click.FloatRange(min=0), default=None,
              help="Untied top-k expanders: train on inputs whose dim j is scaled by std_j^-BALANCE, so latents "
                   "on low-variance dims are not starved of the k places (the loss and the saved model are "
                   "unchanged in kind) [default: 0.5 for a fresh SAE, the starting SAE's own with --init, else 0; "
                   "0: off].")
@config_option(TrainConfig, "afa_coef", "--afa-coef", type=click.FloatRange(min=0),
              help="topafa: weight of the AFA term afa_coef * E(|z| - |x - b_dec|)^2 / E|x - b_dec|^2.")
@config_option(TrainConfig, "l0_coef", "--l0-coef", type=click.FloatRange(min=0),
              help="jumprelu: weight of the sparsity term l0_coef * (L0 / k - 1)^2.")
@config_option(TrainConfig, "bandwidth", "--bandwidth", type=click.FloatRange(min=0, min_open=True),
              help="jumprelu: width of the rectangle kernel of the threshold gradients, for inputs scaled to "
                   "unit mean squared norm (as in the papers; widen it for short runs).")
@config_option(TrainConfig, "threshold_lr", "--threshold-lr", type=click.FloatRange(min=0, min_open=True),
              help="jumprelu: Adam learning rate of the log thresholds (same warm-up and decay as --lr).")
@config_option(TrainConfig, "rate_step", "--rate-step", type=click.FloatRange(min=0, min_open=True),
              help="jumprelu with --sparsity-target rates: step of each latent's log threshold towards its firing "
                   "rate (same warm-up and decay as --lr).")
@click.option("--sparsity-target", type=click.Choice(SPARSITY_TARGETS), default=None,
              help="jumprelu: l0 (the papers' rule: mean L0 pulled to --k) or rates (each latent's threshold follows "
                   "its firing rate in the starting SAE; no L0 term) [default: rates with --init from a jumprelu "
                   "SAE, else l0].")
@config_option(TrainConfig, "encoder", "--encoder", type=click.Choice(ENCODERS),
              help="Expander encoder: its own values on the decoder's mask (untied: much better FVU on LM "
                   "residual streams) or the decoder's values (tied: half the file, the paper's choice).")
@config_option(TrainConfig, "mask_seed", "--mask-seed", type=click.IntRange(min=0), help="Seed of the expander mask.")
@click.option("--mask", type=click.Choice(MASKS), default=None,
              help="With --teacher: how the student's dims are chosen, as in `convert` [default: topd, each "
                   "latent's d largest teacher decoder entries, stored explicitly; keeps far more of the "
                   "teacher]. A fresh SAE always uses the seeded expander mask.")
@config_option(TrainConfig, "auxk_coef", "--auxk-coef", type=click.FloatRange(min=0),
              help="Weight of the AuxK loss on dead latents.")
@click.option("--k-aux", type=click.IntRange(min=0), default=None, help="Dead latents used by AuxK [default: m / 2].")
@click.option("--dead-tokens", type=click.IntRange(min=1), default=None,
              help="A latent is dead after this many tokens without firing "
                   "[default: min(32 * n / k, tokens / 10)].")
@click.option("--reaim-every", type=click.IntRange(min=0), default=None,
              help="Steps between reviving dead latents of a native expander run on the rows they "
                   "nearly fire on, decoder aimed at the residual (0: never; not when distilling) "
                   "[default: 5; 0 for jumprelu / batchtopk, whose revived latents jump in at their threshold, "
                   "and topafa].")
@config_option(TrainConfig, "distill_coef", "--distill-coef", type=click.FloatRange(min=0),
              help="Weight of the latent-matching term (with --teacher).")
@click.option("--held-out", type=click.IntRange(min=0), default=None,
              help="Rows at the end of --acts kept out of training, for the final metrics (0: none) "
                   "[default: 8192, at most a tenth of the rows]; with --model the rows after the training text "
                   "[default: 8192].")
@config_option(TrainConfig, "checkpoint_every", "--checkpoint-every", type=click.IntRange(min=1),
              help="Steps between checkpoints.")
@config_option(TrainConfig, "seed", "--seed", type=click.IntRange(min=0), help="Seed of initialisation and data order.")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt (same options required; any number of processes).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (torch.distributed, gloo): data parallel, each trains on its share of "
                   "every --batch-size batch, the result as one process would train it (with --model each also runs "
                   "the LM on its share of the text; see --distribute-hookpoints). Under torchrun leave it out "
                   "(torchrun starts the processes).")
@hub_options
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object.")
def train(acts, model_path, gguf_file, texts, context, keep_first, outlier_factor, layers, site, lm_batch,
          distribute_hookpoints, window, out, d, dense, k, n, expansion, teacher, init, tokens, batch_size, batch_alias, lr, activation,
          balance, afa_coef, l0_coef,
          bandwidth, threshold_lr, rate_step, sparsity_target, encoder,
          mask_seed, mask, auxk_coef, k_aux, dead_tokens, reaim_every, distill_coef, held_out, checkpoint_every, seed,
          resume, nproc, hub, as_json) -> None:
    """Train an Expander SAE (or, with --dense, a TopK baseline) on activations.

    \b
    Native:   saecompress train --acts acts/ --d 7 --k 32 --expansion 8 --out sae.safetensors
    Live LM:  saecompress train --model ./lm --text corpus/ --layers 6,12 --d 7 --expansion 8 --out saes/
    JumpReLU: saecompress train --acts acts/ --dense --activation jumprelu --k 32 --expansion 8 --out sae/
    Distil:   saecompress train --acts acts/ --d 7 --teacher ./dense-sae --out sae.safetensors
    Processes: saecompress train --nproc 2 ...   (or: torchrun --nproc_per_node 2 -m saecompress -- train ...)
    Ctrl-C writes a checkpoint; rerun the same command with --resume to continue.
    """
    given = {name for name in ("batch_size", "d", "encoder", "mask_seed", "mask")
             if click.get_current_context().get_parameter_source(name).name == "COMMANDLINE"}
    if batch_alias is not None and "batch_size" in given:
        raise SaeCompressError("--batch is the older name of --batch-size; give one of them")
    expander_only = sorted(given & {"d", "encoder", "mask_seed", "mask"})
    if dense and expander_only:
        raise SaeCompressError(f"--{expander_only[0].replace('_', '-')} sets up an expander SAE; a --dense baseline "
                               "has no mask or expander encoder: drop it, or drop --dense")
    batch = batch_size if batch_alias is None else batch_alias
    cfg = TrainConfig(k=k, d=None if dense else d, n=n, expansion=expansion, activation=activation, l0_coef=l0_coef,
                      afa_coef=afa_coef, balance=balance,
                      bandwidth=bandwidth, threshold_lr=threshold_lr, rate_step=rate_step,
                      sparsity_target=sparsity_target,
                      encoder=encoder, mask_seed=mask_seed, mask=mask, tokens=tokens, batch_size=batch, lr=lr,
                      k_aux=k_aux, auxk_coef=auxk_coef, dead_tokens=dead_tokens, reaim_every=reaim_every, distill_coef=distill_coef,
                      held_out_rows=held_out, checkpoint_every=checkpoint_every, seed=seed)
    if model_path is not None:
        _train_from_model(model_path, gguf_file, texts, context, keep_first, outlier_factor, layers, site, lm_batch,
                          window, held_out, out, cfg, acts=acts, teacher=teacher, init=init, nproc=nproc, resume=resume,
                          distribute=distribute_hookpoints, as_json=as_json)
        return
    if acts is None:
        raise SaeCompressError("say what to train on: --acts ACTS (activation files) or --model M --text T --layers L")
    ctx = click.get_current_context()
    stream_only = [f"--{name.replace('_', '-')}" for name in ("texts", "layers", "gguf_file", "context", "keep_first",
                                                              "outlier_factor", "site", "lm_batch", "window",
                                                              "distribute_hookpoints")
                   if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    if stream_only:
        raise SaeCompressError(f"{stream_only[0].replace('--texts', '--text')} is for training from a live model: give --model, or drop it")
    group = process_group(nproc)
    if nproc > 1:
        _, metrics = run_ranks(nproc, run_training, acts, out, cfg, teacher=teacher, init=init, resume=resume,
                               progress=True, hub=hub, checkpoint=f"{out}{CHECKPOINT_SUFFIX}")[0]
    else:
        _, metrics = run_training(acts, out, cfg, teacher=teacher, init=init, resume=resume, progress=True, hub=hub,
                                  group=group)
    if not group.main:
        return
    if as_json:
        click.echo(dumps(metrics))
        return
    click.echo(_summary(out, metrics))
    if str(out).endswith(".safetensors") and _pursuit_applies(out):
        click.echo(f"next: `saecompress convert {out} PURSUIT.safetensors --encoder pursuit` stores this decoder "
                   "with a matching-pursuit encoder and no encoder values: the best fidelity per byte measured "
                   "(docs/FIDELITY.md)")


def _pursuit_applies(out) -> bool:
    """Whether ``out`` is a top-k Expander SAE with its own encoder, which ``convert --encoder pursuit`` can re-encode."""
    meta = read_compact_metadata(out)
    return meta["encoder"] != "pursuit" and meta["activation"] in ACTIVATIONS


def _summary(out, metrics: dict) -> str:
    """The line a finished run prints for the SAE it wrote to ``out``."""
    held = metrics.get("held_out", {})
    line = f"wrote {out}: {metrics['training']['tokens']:,} tokens"
    if held:
        line += (f"; held-out FVU {held['fvu']:.4f}, L0 {held['l0']:.1f}, "
                 f"dead {held['dead_fraction']:.2%}")
    if "max_l0" in metrics["training"]:
        line += f"; k set to {metrics['training']['max_l0']} ({metrics['training']['max_l0_rule']})"
        if "latent_agreement" in held:
            line += f", latent agreement {held['latent_agreement']:.1%}"
    return line


def _train_from_model(model_path, gguf_file, texts, context, keep_first, outlier_factor, layers, site, lm_batch, window,
                      held_out, out, cfg, *, acts, teacher, init, nproc, resume, distribute, as_json) -> None:
    from ..stream import CHECKPOINT_NAME, StreamConfig, train_from_files
    from ..texts import text_files

    for flag, given in (("--acts", acts), ("--teacher", teacher), ("--init", init)):
        if given:
            raise SaeCompressError(f"{flag} does not go with --model (training from a live model starts fresh SAEs "
                                   "for now): drop it")
    if not texts or not layers:
        raise SaeCompressError("training from a live model needs --text (files or folders) and --layers (e.g. 6,12)")
    try:
        parsed = tuple(int(part) for part in layers.split(","))
    except ValueError:
        raise SaeCompressError(f"--layers {layers}: give layer numbers separated by commas, e.g. 6,12,18") from None
    stream = StreamConfig(layers=parsed, site=site, context=context, lm_batch=lm_batch, window=window,
                          drop_first=not keep_first, outlier_factor=outlier_factor or None,
                          held_out=8192 if held_out is None else held_out)
    stream.check()
    files = text_files(texts)
    group = process_group(nproc)
    if distribute and max(nproc, group.world) == 1:
        raise SaeCompressError("--distribute-hookpoints shares the hookpoints out among processes: give --nproc N "
                               "(or start the run with torchrun), or drop it")
    run = dict(resume=resume, distribute=distribute, progress=True)
    if nproc > 1:
        results = {}
        for part in run_ranks(nproc, train_from_files, model_path, gguf_file, files, out, cfg, stream,
                              checkpoint=f"{out}/{CHECKPOINT_NAME}", **run):
            results.update(part)
    else:
        results = train_from_files(model_path, gguf_file, files, out, cfg, stream, group=group, **run)
    if not results:  # another rank of a torchrun run writes and reports
        return
    if as_json:
        click.echo(dumps(results))
        return
    for name, metrics in results.items():
        click.echo(_summary(f"{out}/{name}", metrics))
        if metrics["training"].get("text_ran_out"):
            click.echo(f"warning: the text ran out: {name} trained on {metrics['training']['tokens']:,} of the "
                       f"{cfg.tokens:,} tokens asked (its learning rate had not decayed); give more text", err=True)
