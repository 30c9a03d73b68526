terraform {
  # 1.0 is the oldest release with everything used here (validation blocks, optional module
  # versions); the providers below are pinned to a minor release.
  required_version = ">= 1.0.3, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.70"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, { "app.kubernetes.io/part-of" = "kubiot" })
  }
}
