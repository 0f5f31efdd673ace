import sys

try:
    from metabench.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing
    print("metabench: interrupted (Ctrl-C) before anything started.", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
