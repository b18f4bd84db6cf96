from mpitrain.cli import main

raise SystemExit(main())
