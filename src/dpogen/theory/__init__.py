"""The theory stage, one idea per module: bounds (and their conditions), certificates, geometry of g(x),
dynamics (the margin recursion, envelope, tau_1), claims, and stage (run_theory, what rule theory writes).

Formulas are docs/theory.md's (Im & Li, arXiv 2408.03459). The package imports nothing itself, so a module that
uses one part (the report uses bounds.smallest_q) does not depend on the others' code.
"""
