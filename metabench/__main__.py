from metabench.cli import main

raise SystemExit(main())
