output "region" {
  description = "AWS region of the installation."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name; `aws eks update-kubeconfig --name` takes it."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.eks.cluster_endpoint
}

output "kubeconfig_command" {
  description = "Command that points kubectl and helm at the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}

output "ecr_registry" {
  description = "Registry host, for `skaffold run -p eks --default-repo`."
  value       = split("/", aws_ecr_repository.images["operator"].repository_url)[0]
}

output "ecr_repository_urls" {
  description = "Image repositories of the operator and the ingest service."
  value       = { for name, repository in aws_ecr_repository.images : name => repository.repository_url }
}

output "operator_role_arn" {
  description = "IAM role for the operator's service account (serviceAccount.annotations in values-eks.yaml)."
  value       = aws_iam_role.operator.arn
}

output "database_endpoint" {
  description = "Host name of the telemetry database."
  value       = aws_db_instance.telemetry.address
}

output "database_port" {
  description = "Port of the telemetry database."
  value       = aws_db_instance.telemetry.port
}

output "database_name" {
  description = "Database the ingest services write to."
  value       = aws_db_instance.telemetry.db_name
}

output "database_secret_arn" {
  description = "Secrets Manager secret with the database user and password (managed by RDS)."
  value       = aws_db_instance.telemetry.master_user_secret[0].secret_arn
}

output "helm_values" {
  description = "Values for charts/kubiot on this cluster: save as values-eks.generated.yaml and pass after values-eks.yaml."
  value = yamlencode({
    operator = {
      image = { repository = aws_ecr_repository.images["operator"].repository_url }
    }
    ingest = {
      image = { repository = aws_ecr_repository.images["ingest"].repository_url }
    }
    serviceAccount = {
      annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.operator.arn }
    }
  })
}
