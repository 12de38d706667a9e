"""loka.app.demo (top layer): the whole workflow shown end to end, for ``loka demo``.

``ranker`` runs train -> probe -> mods -> plan -> convert -> train -> gate -> serve on
the bundled ranker (``loka.models``); ``mlp`` is the one-minute per-layer error table of
a small MLP; ``fp8`` chooses what the FP8 side trains when the plan keeps every site in
bf16; ``summary`` prints the end-of-run table; ``cli`` registers the command. Nothing
below this layer imports it.
"""
