"""The measurements behind the chapters, one module per chapter topic, named as the figure
modules in quantlab.viz that draw them:

    outliers     chapter 3: outlier channels, per-token int8, SmoothQuant, rotation
    calibrated   chapter 4: GPTQ and AWQ against round to nearest
    fp8          chapter 5: FP8 end to end, static against dynamic scales
    kv           chapter 7: KV-cache codecs on a real model (python -m quantlab.studies.kv)
    deploy       chapters 9 and 10: what vLLM serves and what fits; the recommender

Studies build on the core (formats, schemes, quantize, nn, eval, algorithms, kv codecs, io) and
the core never imports a study (tests/test_layout.py checks it). Import a study by its module:
`from quantlab.studies import outliers`; nothing is imported here, so the core stays light.
"""
