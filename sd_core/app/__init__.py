"""``emoji-sd app``: the local web page that draws from the champion (see :mod:`sd_core.app.server`)."""
