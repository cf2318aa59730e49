"""The processes of a run: who a process is (:mod:`~sd_core.runtime.process`), the reaper that stops what a
run started however it ends (:mod:`~sd_core.runtime.reaper`), how SIGTERM and SIGINT unwind a run
(:mod:`~sd_core.runtime.signals`), and which process runs a stage (:mod:`~sd_core.runtime.running`).

It sits just above the store (it keeps its run file and markers through the store's atomic files) and below
every stage; see docs/architecture.md."""
