# Read by `python exoscale.py import-terraform --ssh-key KEY` (it runs `terraform output -json`).
output "nodes" {
  description = "The cluster's nodes: name, role, public IP, id"
  value = [for n in exoscale_compute_instance.node : {
    name      = n.name
    role      = n.labels["role"]
    public_ip = n.public_ip_address
    id        = n.id
  }]
}

output "ssh_user" {
  description = "The template's login user"
  value       = data.exoscale_template.node.default_user
}

output "security_group_id" {
  value = exoscale_security_group.cluster.id
}
