locals {
  labels = {
    cluster    = var.name
    managed-by = "raysweep"
  }
  node_names = concat(["${var.name}-head"], [for i in range(1, var.nodes) : "${var.name}-worker-${i}"])
}

data "exoscale_template" "node" {
  zone = var.zone
  name = var.template
}

resource "exoscale_ssh_key" "cluster" {
  name       = "raysweep-${var.name}"
  public_key = var.ssh_public_key
}

# Inbound: SSH from the allowed CIDR, everything between members. Nothing else (Ray's ports included).
resource "exoscale_security_group" "cluster" {
  name        = "raysweep-${var.name}"
  description = "raysweep cluster ${var.name}"
}

resource "exoscale_security_group_rule" "ssh" {
  security_group_id = exoscale_security_group.cluster.id
  type              = "INGRESS"
  protocol          = "TCP"
  cidr              = var.ssh_cidr
  start_port        = 22
  end_port          = 22
  description       = "SSH from the allowed CIDR"
}

resource "exoscale_security_group_rule" "members" {
  security_group_id      = exoscale_security_group.cluster.id
  type                   = "INGRESS"
  protocol               = "ALL"
  user_security_group_id = exoscale_security_group.cluster.id
  description            = "everything between cluster members"
}

resource "exoscale_compute_instance" "node" {
  count              = var.nodes
  zone               = var.zone
  name               = local.node_names[count.index]
  type               = var.instance_type
  template_id        = data.exoscale_template.node.id
  disk_size          = var.disk_size
  ssh_key            = exoscale_ssh_key.cluster.name
  security_group_ids = [exoscale_security_group.cluster.id]
  labels             = merge(local.labels, { role = count.index == 0 ? "head" : "worker" })
}
