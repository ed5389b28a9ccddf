from jax_lstm.cli import main

raise SystemExit(main())
