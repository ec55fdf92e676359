"""A local Exoscale API v2 (state model, HTTP layer, local VM hosts) for tests and dry runs."""
