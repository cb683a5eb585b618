"""Prepares a moto server that checks signatures (started with
INITIAL_NO_AUTH_ACTION_COUNT=4): its first four actions, unauthenticated, make the
bucket, a user, the user's access key and a policy letting it use S3. Prints the key ID
and secret; every request after these must be signed with them."""
import json, sys, boto3
endpoint = sys.argv[1]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket="ox-test")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="oxd")
key = iam.create_access_key(UserName="oxd")["AccessKey"]
iam.put_user_policy(UserName="oxd", PolicyName="s3", PolicyDocument=json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
print(key["AccessKeyId"], key["SecretAccessKey"])
