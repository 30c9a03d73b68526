# IAM role for the operator's service account (IRSA): it may read the database credentials in
# Secrets Manager, to hand each tenant namespace its `kubiot-database` Secret, and nothing else.

data "aws_iam_policy_document" "operator_trust" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [module.eks.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = ["system:serviceaccount:${var.operator_namespace}:${var.operator_service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "operator" {
  name_prefix        = "${var.name}-operator-"
  description        = "kubiot operator (IRSA for ${var.operator_namespace}/${var.operator_service_account})"
  assume_role_policy = data.aws_iam_policy_document.operator_trust.json
}

data "aws_iam_policy_document" "database_secret_read" {
  statement {
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_db_instance.telemetry.master_user_secret[0].secret_arn]
  }
}

resource "aws_iam_role_policy" "operator_database_secret" {
  name   = "read-database-secret"
  role   = aws_iam_role.operator.id
  policy = data.aws_iam_policy_document.database_secret_read.json
}
