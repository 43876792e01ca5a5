"""The kernel properties, in the package so that `minifd check` and the tests run the same code.

PROPERTIES maps a name to a registry.Property: a hypothesis strategy of cases, a check that runs
one case on a backend and compares it with a float64 reference, and the backends it applies to.
runner.run_property drives one with hypothesis.
"""

from minifd.properties import decode_attention, decoder_layer, fused, linear, prefill_attention

PROPERTIES = {prop.name: prop
              for module in (decode_attention, prefill_attention, linear, fused, decoder_layer)
              for prop in module.PROPERTIES}
