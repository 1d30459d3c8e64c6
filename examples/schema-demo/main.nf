#!/usr/bin/env nextflow
// A DSL2 pipeline whose parameters are described by nextflow_schema.json (nf-schema style):
// nfapi builds its launch form and validates values from that file.
nextflow.enable.dsl = 2

params.samplesheet = null
params.reads = null
params.outdir = 'results'
params.min_quality = 20
params.trim = true
params.aligner = 'bwa'
params.label = 'run'

process QC {
    tag "${reads.name}"
    publishDir params.outdir, mode: 'copy'

    input:
    path reads

    output:
    path "${reads.name}.qc.txt"

    script:
    """
    echo "${params.label} ${reads.name} q>=${params.min_quality} trim=${params.trim}" > ${reads.name}.qc.txt
    """
}

process ALIGN {
    publishDir params.outdir, mode: 'copy'

    input:
    path qc
    path samplesheet

    output:
    path 'aligned.txt'

    script:
    """
    echo "aligned with ${params.aligner}" > aligned.txt
    cat ${qc} >> aligned.txt
    """
}

workflow {
    qc = QC(Channel.fromPath(params.reads, checkIfExists: true))
    ALIGN(qc.collect(), file(params.samplesheet, checkIfExists: true))
}
