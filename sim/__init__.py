"""The simulator: model and hardware specs, cost model, memory budget, expert cache, policies and
the SimPy engine. Importing ``sim`` pulls in nothing heavy (and never torch); import submodules
(``sim.spec``, ``sim.hardware``, ``sim.costmodel``, ``sim.memory``, ...) for what you need."""
