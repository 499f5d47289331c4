from medfound.cli import main

raise SystemExit(main())
