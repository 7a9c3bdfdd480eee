from callmesh_cli.cli import main

raise SystemExit(main())
