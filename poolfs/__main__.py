from poolfs.cli import main

raise SystemExit(main())
