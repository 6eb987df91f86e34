"""The oracle tools: everything that judges an implementation against the reference.

Layer 4 of attention_ref (above the adapters, which it drives):

* ``compare`` -- the one comparison report (:class:`~attention_ref.oracle.compare.Comparison`),
  ``assert_close`` and the default tolerances;
* ``tables`` -- the one table renderer of the command line (text, markdown, JSON);
* ``gradcheck`` -- finite differences and the complex step, (G1)-(G6);
* ``testing`` -- the error-budget rule and the low-precision baselines;
* ``cases`` -- the named canonical cases;
* ``exact`` -- the mpmath reference;
* ``golden`` -- golden files for implementations outside Python;
* ``conformance`` -- PyTorch and JAX run on every canonical case through the adapters;
* ``check`` -- the main job: every backward against finite differences and the complex step.

May import: numpy, :mod:`attention_ref.core`, :mod:`attention_ref.variants` and
:mod:`attention_ref.adapters`. The documented faces are :mod:`attention_ref.testing`,
:mod:`attention_ref.cases`, :mod:`attention_ref.golden` and :mod:`attention_ref.gradcheck`.
"""
