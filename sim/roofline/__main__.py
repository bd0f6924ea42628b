import sys

from sim.experiments.roofline import main

sys.exit(main())
