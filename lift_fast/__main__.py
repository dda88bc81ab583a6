from lift_fast.cli import main

raise SystemExit(main())
