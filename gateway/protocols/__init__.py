"""One module per wire protocol: how to prepare the upstream body and how to
read usage from the response bytes as they pass."""
