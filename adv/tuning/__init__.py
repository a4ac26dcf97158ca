"""The Ray-free half of the Tune stage (``jobs.tune``): search spaces, trial bodies, objective, report.

* :mod:`adv.tuning.space`: namespaced search spaces validated against the registries' parameter models;
* :mod:`adv.tuning.splits`: the validation subset, disjoint from the test subset the final numbers use;
* :mod:`adv.tuning.trials`: what a trial computes (stored, adaptive, training), with a ``report`` callback;
* :mod:`adv.tuning.objective`: the constrained objective, 95% intervals, the Pareto front, the selection;
* :mod:`adv.tuning.report`: report.md with the Pareto figure and the table of every trial.
"""
