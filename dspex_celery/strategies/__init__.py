"""Execution strategies: how modules of an execution get dispatched.

A strategy starts an execution and hears about every module that reaches a final state; the
``levels`` family (:mod:`.levels`) lets chords do the waiting, ``dag`` (:mod:`.dag`) dispatches each
module when its parents are done. :mod:`.base` is what they share, :mod:`.registry` finds one by name.
"""
