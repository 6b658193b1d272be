"""Generated from proto/fleetcare/v1 by clients/python/generate.sh. Do not edit."""
