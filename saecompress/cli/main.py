"""The ``saecompress`` command group: lazy subcommands, one-line errors, ``--debug`` tracebacks."""

from __future__ import annotations

import importlib
import os
import sys

import click

from .._version import __version__
from ..errors import SaeCompressError

# name -> one-line help. Each command lives in saecompress/cli/<name>.py as a click command <name>.
COMMANDS = {
    "demo": "Run the main job end to end: convert, evaluate, export, monitor, compare (offline default).",
    "info": "Show what a compact file holds and how much it saves.",
    "convert": "Convert a dense TopK SAE (SAELens, sparsify, OpenAI, dictionary_learning, paper) to expander form.",
    "acts": "Harvest activations from a transformers model over text files.",
    "train": "Train an Expander SAE natively, or distil a converted one from its dense teacher.",
    "finetune": "Fine-tune an SAE through its LM (KL to the clean model's predictions + reconstruction).",
    "sweep": "Make, measure and plot Expander SAEs over recipes, d values and dtypes against dense baselines.",
    "eval": "Measure FVU, L0, dead latents and CE-loss recovered of any SAE source.",
    "export": "Export an SAE to ONNX (encode / decode / autoencoder graphs).",
    "monitor": "Run an SAE over activations with onnxruntime and print features or alerts.",
    "push": "Upload compact SAEs (and a model card) to the Hugging Face Hub.",
    "pull": "Download compact SAEs from the Hugging Face Hub.",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        command = getattr(importlib.import_module(f"saecompress.cli.{name}"), name)
        if not any(param.name == "debug" for param in command.params):
            command.params.append(_debug_option())  # `saecompress CMD ... --debug` works too
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quit_on_closed_pipe()
        except click.UsageError as err:  # a bad option value: one error line too, not click's usage block
            if ctx.meta.get("saecompress.debug") or err.ctx is None or err.ctx.parent is None:
                raise
            click.echo(f"error: {err.format_message()} (see `{err.ctx.command_path} --help`)", err=True)
            sys.exit(2)
        except ModuleNotFoundError as err:
            if ctx.meta.get("saecompress.debug") or (err.name or "").split(".")[0] != "torch":
                raise
            click.echo("error: this command needs torch, which this install lacks (saecompress[runtime] runs "
                       "`monitor` on .onnx files, `pull` and `info`): install it with pip install 'saecompress[cpu]' "
                       "(torch first: see the README)", err=True)
            sys.exit(2)
        except (SaeCompressError, OSError) as err:
            if ctx.meta.get("saecompress.debug"):
                raise
            _close_progress_bars()
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


SIGPIPE_STATUS = 141  # what a shell reports for a Unix tool killed by SIGPIPE (128 + 13)


def _quit_on_closed_pipe() -> None:
    """The reader of stdout went away (``saecompress monitor … | head -1``): stop quietly, like Unix tools.

    Exits with status 141. stdout is pointed at /dev/null first, so the interpreter's final flush
    of what is still buffered cannot fail and print "Exception ignored … BrokenPipeError".
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(SIGPIPE_STATUS)


def _close_progress_bars() -> None:
    """Close the tqdm bars still drawing, so the error line starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:  # the group's and the command's --debug share ctx.meta; either one turns it on
        ctx.meta["saecompress.debug"] = True


def _debug_option() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug, is_eager=True,
                        help="Show full tracebacks instead of one-line errors.")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="saecompress")
def cli() -> None:
    """Compress sparse autoencoders to Expander SAEs and ship them to production.

    \b
    Typical flow:
      saecompress demo                                         # all of it, offline, on a shipped default
      saecompress convert ./my-sae out.safetensors --d 7     # dense TopK SAE -> expander
      saecompress info out.safetensors                         # sizes and settings
      saecompress export out.safetensors out.onnx              # onnxruntime graph
      saecompress monitor out.onnx --input acts.npy --top 5    # features per row
    """


cli.params.append(_debug_option())


def main() -> None:
    cli(prog_name="saecompress")


if __name__ == "__main__":
    main()
