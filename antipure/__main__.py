"""``python -m antipure run WORKFLOW --images DIR --out DIR [--set NODE.INPUT=VALUE ...]`` or ``python -m antipure demo``."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["demo"]:
        from antipure.demo import main as demo_main

        sys.exit(demo_main(sys.argv[2:]))
    from antipure.cli import main

    sys.exit(main())
