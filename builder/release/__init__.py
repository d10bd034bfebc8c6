"""Release archives of built bundles, and rebuilding an archive from the recipe its manifest records."""
