terraform {
  required_version = ">= 1.3"
  required_providers {
    exoscale = {
      source  = "exoscale/exoscale"
      version = "~> 0.62"
    }
  }
}

# Credentials come from EXOSCALE_API_KEY / EXOSCALE_API_SECRET, as for exoscale.py.
provider "exoscale" {}
