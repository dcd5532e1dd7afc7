"""The engine: read a model's program and run it again with every weight product through a rule.

Private: the public surface is :func:`fa_jax.value_and_grad`, :func:`fa_jax.init_feedback`,
:func:`fa_jax.plan` and :func:`fa_jax.tap`.
"""
