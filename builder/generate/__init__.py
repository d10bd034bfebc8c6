"""`sdbuild generate`: an image from a built bundle, to look at what it produces before shipping it.

`built` finds the bundle and the cached stage outputs behind it (refusing a stale one), `backend`
turns its models into callables (Core ML on macOS, the verified torch modules elsewhere), and a
family module (`families`) runs that family's pipeline on them.
"""
