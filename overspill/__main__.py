from overspill.cli import main

raise SystemExit(main())
