variable "region" {
  description = "AWS region of the cluster, database and image repositories."
  type        = string
  default     = "eu-west-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "The region must be an AWS region name such as eu-west-1."
  }
}

variable "name" {
  description = "Name of the installation; prefixes the cluster, database and IAM roles."
  type        = string
  default     = "kubiot"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "The name must be 3 to 32 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version (major.minor)."
  type        = string
  default     = "1.30"

  validation {
    # As charts/kubiot/Chart.yaml: the CRDs' validation rules carry fieldPath (1.28+).
    condition     = can(regex("^1\\.(2[89]|[3-9][0-9])$", var.kubernetes_version))
    error_message = "The Kubernetes version must be 1.28 or later, as major.minor."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC; split into public, private and database subnets."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "The VPC CIDR must be a valid IPv4 block of /20 or larger."
  }
}

variable "availability_zone_count" {
  description = "Availability zones the subnets, nodes and (with multi-AZ) the database span."
  type        = number
  default     = 3

  validation {
    condition     = var.availability_zone_count >= 2 && var.availability_zone_count <= 4
    error_message = "EKS and RDS need at least 2 availability zones; at most 4 are used."
  }
}

variable "node_instance_types" {
  description = "EC2 instance types of the managed node group, in order of preference."
  type        = list(string)
  default     = ["m6i.large"]

  validation {
    condition     = length(var.node_instance_types) > 0
    error_message = "At least one instance type is required."
  }
}

variable "node_min_size" {
  description = "Fewest nodes in the managed node group."
  type        = number
  default     = 2

  validation {
    condition     = var.node_min_size >= 1
    error_message = "The node group needs at least one node."
  }
}

variable "node_max_size" {
  description = "Most nodes in the managed node group."
  type        = number
  default     = 6

  validation {
    condition     = var.node_max_size >= 1 && var.node_max_size <= 100
    error_message = "The node group maximum must be between 1 and 100."
  }
}

variable "node_desired_size" {
  description = "Nodes the group starts with (the cluster autoscaler moves it afterwards)."
  type        = number
  default     = 3

  validation {
    condition     = var.node_desired_size >= 1
    error_message = "The desired node count must be at least 1."
  }
}

variable "db_engine_version" {
  description = "RDS PostgreSQL major version. RDS has no TimescaleDB: the ingest service uses native partitioning there."
  type        = string
  default     = "16"

  validation {
    condition     = contains(["14", "15", "16", "17"], var.db_engine_version)
    error_message = "The PostgreSQL version must be one of 14, 15, 16 or 17."
  }
}

variable "db_instance_class" {
  description = "RDS instance class of the telemetry database."
  type        = string
  default     = "db.m6g.large"

  validation {
    condition     = can(regex("^db\\.[a-z0-9]+\\.[a-z0-9]+$", var.db_instance_class))
    error_message = "The instance class must look like db.m6g.large."
  }
}

variable "db_allocated_storage_gb" {
  description = "Initial storage of the database in GiB; storage autoscaling grows it up to 10 times this."
  type        = number
  default     = 100

  validation {
    condition     = var.db_allocated_storage_gb >= 20 && var.db_allocated_storage_gb <= 6553
    error_message = "Storage must be between 20 and 6553 GiB."
  }
}

variable "db_multi_az" {
  description = "Run the database with a synchronous standby in a second availability zone."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated backups and point-in-time recovery kept for the database."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 1 && var.db_backup_retention_days <= 35
    error_message = "RDS keeps backups for 1 to 35 days."
  }
}

variable "db_deletion_protection" {
  description = "Refuse to delete the database (turn off only to tear down a test installation)."
  type        = bool
  default     = true
}

variable "operator_namespace" {
  description = "Namespace the kubiot chart is installed in; the IAM role trusts its service account there."
  type        = string
  default     = "kubiot-system"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", var.operator_namespace))
    error_message = "The namespace must be a valid Kubernetes namespace name."
  }
}

variable "operator_service_account" {
  description = "Name of the operator's service account (the chart's full name, `kubiot` by default)."
  type        = string
  default     = "kubiot"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", var.operator_service_account))
    error_message = "The service account must be a valid Kubernetes name."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = {}
}
