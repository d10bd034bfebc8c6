"""Hugging Face Hub sources through the standard Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`,
`HF_HUB_OFFLINE`, `HF_TOKEN`): what a conversion reads from a repository, where the cache holds it,
and `sdbuild fetch`, which fills the cache so a later build needs no network."""
