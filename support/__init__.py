"""The plumbing every pipeline script shares, kept out of the way of the science: settings and
overrides (config), token files and corpora (dataset), checkpoints (checkpoint), the loop's
schedule and log (training), safe file writing (files), several processes (distributed), progress
bars (progress), the BPE tokenizer (tokenizer) and the Triton attention kernel (flash_attention)."""
