"""`wsss params DATASET METHOD [STAGE]`: the resolved parameter blocks of a (dataset, method),
each key with the config key (and file) its value comes from (see wsss_core.stages.explain)."""
from __future__ import annotations

from .explain import params_main


def main(argv: list[str] | None = None) -> int:
    """Print the blocks; 0, or 2 with one line for a bad config or an unknown name."""
    return params_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
