import sys

from sim.experiments.sweep import main

sys.exit(main())
