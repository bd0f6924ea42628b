import sys

from sim.experiments.aggregate import main

sys.exit(main())
