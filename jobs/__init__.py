"""Ray entrypoints (``python -m jobs.<stage>`` or ``ray job submit -- python -m jobs.<stage>``).

Only this package and the serving module import Ray; ``adv`` stays Ray-free.
"""
