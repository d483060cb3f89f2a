from d2v2.cli import main

raise SystemExit(main())
