from callmesh.cli import main

raise SystemExit(main())
