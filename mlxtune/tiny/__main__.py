"""python -m mlxtune.tiny OUT_DIR --arch ARCH [--seed N] [--hidden-size H] [--layers L] [--vocab-size V]
[--tower-hidden W] [--tower-layers N] [--image-size S] [--sliding-window W]"""

from __future__ import annotations

import sys

import click

from . import ARCHS, Sizes, make_tiny


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(ARCHS), required=True, help="Model family.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Weights are a function of it."
)
@click.option("--hidden-size", type=int, default=None, help="Override the tiny hidden size.")
@click.option("--layers", type=int, default=None, help="Override the number of decoder layers.")
@click.option("--vocab-size", type=int, default=None, help="Pad the model vocab (e.g. 262144).")
@click.option("--tower-hidden", type=int, default=None, help="Gemma 4: width of both towers.")
@click.option("--tower-layers", type=int, default=None, help="Gemma 4: layers of each tower.")
@click.option("--image-size", type=int, default=None,
              help="Gemma 3n: side pictures are resized to (default 768, as real).")  # fmt: skip
@click.option("--sliding-window", type=int, default=None,
              help="Gemma 3n: the decoder's sliding window (default 32; 512 as real).")  # fmt: skip
def main(out_dir, arch, seed, hidden_size, layers, vocab_size, tower_hidden, tower_layers,
         image_size, sliding_window):  # fmt: skip
    """Write a tiny random-weight Hugging Face checkpoint for ARCH into OUT_DIR."""
    sizes = Sizes(hidden_size=hidden_size, num_layers=layers, vocab_size=vocab_size,
                  tower_hidden=tower_hidden, tower_layers=tower_layers,
                  image_size=image_size, sliding_window=sliding_window)  # fmt: skip
    try:
        path = make_tiny(out_dir, arch, seed=seed, sizes=sizes)
    except (ValueError, FileExistsError) as e:
        click.echo(f"mlxtune.tiny: error: {e}", err=True)
        sys.exit(2)
    click.echo(f"wrote tiny {arch} checkpoint to {path}")


if __name__ == "__main__":
    main()
