from sim.experiments.sweep import main

main()
