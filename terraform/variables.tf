variable "name" {
  description = "Cluster name: instances are labelled cluster=NAME, the group and key are raysweep-NAME"
  type        = string
  default     = "default"
  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$", var.name))
    error_message = "Use 1-40 lower-case letters, digits and '-'."
  }
}

variable "zone" {
  description = "Exoscale zone"
  type        = string
  default     = "ch-gva-2"
}

variable "nodes" {
  description = "Number of nodes: one head, the rest workers"
  type        = number
  default     = 3
  validation {
    condition     = var.nodes >= 1 && var.nodes <= 100
    error_message = "nodes must be from 1 to 100."
  }
}

variable "instance_type" {
  description = "Instance type, family.size"
  type        = string
  default     = "standard.medium"
}

variable "template" {
  description = "Template name"
  type        = string
  default     = "Linux Ubuntu 24.04 LTS 64-bit"
}

variable "disk_size" {
  description = "Disk size in GiB"
  type        = number
  default     = 50
}

variable "ssh_public_key" {
  description = "The public SSH key the nodes accept (its private half goes to exoscale.py import-terraform --ssh-key)"
  type        = string
}

variable "ssh_cidr" {
  description = "Who may reach port 22; narrow it to your address/32"
  type        = string
  default     = "0.0.0.0/0"
}
