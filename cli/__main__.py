from attrctl.cli import main

raise SystemExit(main())
