from ddref.cli import main

raise SystemExit(main())
