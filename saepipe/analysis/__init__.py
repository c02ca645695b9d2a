"""Feature analysis: what each latent of a trained SAE responds to and does (the ``analyze`` stage).

``run.analyze`` streams token rows (``rows``) through the SAE's encoder (``codes``), then derives per
latent its statistics and histogram (``latents``), top contexts and quantile samples with their
token windows (``contexts``), logit effects (``directions``, ``logits``), nearest latents
(``neighbors``) and per token its top latents (``tokens``), and writes them as the dashboard's data
contract (``writer``). ``saepipe.explore`` builds the notebook API (``sae.analyze_text``, ...) on it.
"""
