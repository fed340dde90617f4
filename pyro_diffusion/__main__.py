"""Command line: ``python -m pyro_diffusion COMMAND [options]``.

Commands:

- ``demo``: disease mapping of SIDS in North Carolina with the shipped diffusion prior,
  checked against NUTS; see :mod:`pyro_diffusion.demo`.
- ``gp-demo``: train (or load) a diffusion prior on Gaussian-process draws, sample it and
  compare; see :mod:`pyro_diffusion.gp_demo`.
"""

import argparse
import sys

from . import demo, gp_demo
from ._version import __version__


def main(argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pyro_diffusion",
        description="pyro-diffusion: learned diffusion models as priors in Pyro models.")
    parser.add_argument("--version", action="version", version=f"pyro-diffusion {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_parser = commands.add_parser(
        "demo", help="map SIDS risk in North Carolina with a diffusion prior, check with NUTS",
        description=demo.DESCRIPTION)
    demo.add_arguments(demo_parser)
    gp_parser = commands.add_parser(
        "gp-demo", help="train a diffusion prior on Gaussian-process draws and compare samples",
        description=gp_demo.DESCRIPTION)
    gp_demo.add_arguments(gp_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(args, demo_parser)
    elif args.command == "gp-demo":
        gp_demo.run(args, gp_parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
