"""``python -m jax_impl.onednn_conv build|status``: the explicit build step of the native library.

``build`` compiles it (or finds a verified current one) and prints one line;
exit 0 when the library is ready, 1 when it cannot be built here (no oneDNN,
no compiler, a failed build: the line says which and the fix). Nothing else
fails: scripts/setup.sh runs it and carries on either way, and the models
then use the ``"canonical"`` convolutions. ``status`` prints whether this
process can load it, and why not.
"""

from __future__ import annotations

import argparse
import sys

from jax_impl import onednn_conv
from jax_impl.onednn_conv.library import BUILD_TIMEOUT_S, OneDNNUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_impl.onednn_conv",
                                     description="Build or check the native oneDNN convolution library.")
    parser.add_argument("command", choices=("build", "status"))
    parser.add_argument("--timeout", type=float, default=BUILD_TIMEOUT_S, metavar="S",
                        help=f"seconds for the lock and for the compiler (default {BUILD_TIMEOUT_S:g})")
    parser.add_argument("--force", action="store_true", help="rebuild even when a verified library exists")
    args = parser.parse_args(argv)
    if args.command == "status":
        reason = onednn_conv.unavailable_reason()
        print(f"oneDNN convolutions: unavailable: {reason}" if reason else "oneDNN convolutions: available")
        return 0 if not reason else 1
    try:
        path = onednn_conv.build(args.timeout, args.force)
    except OneDNNUnavailable as e:
        print(f"oneDNN convolutions not built: {e} (the models use XLA's convolutions; "
              f"fix: {onednn_conv.INSTALL_HINT})")
        return 1
    print(f"oneDNN convolutions: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
