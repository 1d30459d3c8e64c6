#!/usr/bin/env nextflow
// A small DSL2 pipeline that uses every nfapi argument type:
//   reference (path), extra_files (paths), reads (file-glob), min_length (number), title (text).
nextflow.enable.dsl = 2

params.reference = null
params.extra_files = ''
params.reads = null
params.min_length = 10
params.title = 'demo'
params.outdir = 'results'

process COUNT_LINES {
    tag "${reads.name}"
    publishDir params.outdir, mode: 'copy'

    input:
    path reads

    output:
    path "${reads.name}.count"

    script:
    """
    awk 'length(\$0) >= ${params.min_length}' ${reads} | wc -l > ${reads.name}.count
    """
}

process SUMMARY {
    publishDir params.outdir, mode: 'copy'

    input:
    path counts
    path reference
    path extras

    output:
    path 'summary.txt'

    script:
    """
    echo '${params.title.replace("'", "")}' > summary.txt
    echo "reference: \$(wc -c < ${reference}) bytes" >> summary.txt
    echo "extra files: ${extras.size()}" >> summary.txt
    cat ${counts} >> summary.txt
    """
}

workflow {
    reads = Channel.fromPath(params.reads, checkIfExists: true)
    extras = params.extra_files ? Channel.fromPath(params.extra_files.tokenize(',')).collect() : Channel.value([])
    counts = COUNT_LINES(reads)
    SUMMARY(counts.collect(), file(params.reference, checkIfExists: true), extras)
}
